"""A small CNN classifier for the 8x8 optdigits images (and, at side 28, for Fashion-MNIST): the reward model
and the feature extractor for the Frechet distance and precision/recall of the "digits" ("fashion") model.

It is trained only on the "train" split, with random shifts of up to 1 pixel (digits) or 2 pixels and
horizontal flips (fashion), and a little pixel noise, so it also judges generated images fairly; the
held-out "test" split only measures it.

    python -m eval.benchmark.classifier --out weights/digits_classifier   # train, test, save
    python -m eval.benchmark.classifier --model fashion --out weights/fashion_classifier
    from eval.benchmark.classifier import load_classifier; clf = load_classifier()  # logits / features
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from npo_min import cli
from npo_min.checkpoint import atomic_write, load_into, load_state_dict, save_safetensors
from npo_min.digits import NUM_CLASSES, load_digits
from npo_min.fashion import load_fashion


def conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class DigitClassifier(nn.Module):
    """Grey images in [-1, 1] -> class logits. Input `(B, 1, side, side)`, side 8 (digits) or 28 (fashion); logits `(B, 10)`."""

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = NUM_CLASSES, side: int = 8):
        super().__init__()
        if side not in (8, 28):
            raise ValueError(f"the classifier takes 8x8 (digits) or 28x28 (fashion) images; got side {side}.")
        self.config = dict(width=width, feature_dim=feature_dim, num_classes=num_classes)
        if side == 8:
            self.body = nn.Sequential(
                conv_block(1, width),                  # (B, w, 8, 8)
                conv_block(width, width),
                conv_block(width, 2 * width, stride=2),  # (B, 2w, 4, 4)
                conv_block(2 * width, 2 * width),
            )
            last = 4
        else:
            self.config["side"] = side
            self.body = nn.Sequential(
                conv_block(1, width),                        # (B, w, 28, 28)
                conv_block(width, 2 * width, stride=2),      # (B, 2w, 14, 14)
                conv_block(2 * width, 2 * width, stride=2),  # (B, 2w, 7, 7)
                conv_block(2 * width, 2 * width),
            )
            last = 7
        self.fc = nn.Linear(2 * width * last * last, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features `(B, feature_dim)` (after SiLU), used for the Frechet distance."""
        return F.silu(self.fc(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DigitMLP(nn.Module):
    """The judging classifier's architecture (a different one from the reward's CNN, so the two do not share
    its blind spots): 8x8 digits `(B, 1, 8, 8)` -> flattened 64 pixels -> 2 hidden SiLU layers -> logits `(B, 10)`."""

    def __init__(self, width: int = 256, feature_dim: int = 128, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.config = dict(arch="mlp", width=width, feature_dim=feature_dim, num_classes=num_classes)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.fc = nn.Linear(width, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.fc(self.body(x)))  # (B, 1, 8, 8) -> (B, 64) -> (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHS = {"cnn": DigitClassifier, "mlp": DigitMLP}
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "digits_classifier"
WEIGHTS = {"digits": DEFAULT_WEIGHTS, "fashion": DEFAULT_WEIGHTS.with_name("fashion_classifier")}
DATA = {"digits": load_digits, "fashion": load_fashion}  # split -> (images, labels)


def load_classifier(path: str | Path = DEFAULT_WEIGHTS) -> DigitClassifier:
    """Build the classifier from `path/config.json`, strictly load `path/model.safetensors`, eval mode.

    Raises FileNotFoundError: no classifier there (the message names the command that trains it).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no classifier at {path}: train one with `python -m eval.benchmark.classifier --out {path}` "
                                "(add --model fashion for the fashion one).")
    cfg = json.loads((path / "config.json").read_text())
    cls = ARCHS[cfg.get("arch", "cnn")]  # configs written before the MLP existed are the CNN
    sizes = {"side": cfg["side"]} if "side" in cfg else {}  # the 28x28 (fashion) CNN
    model = cls(**{k: cfg[k] for k in ("width", "feature_dim", "num_classes")}, **sizes)
    load_into(model, load_state_dict(path), cls.__name__)
    return model.eval()


def augment(x: torch.Tensor, gen: torch.Generator, noise: float, shift: int = 1, flip: bool = False) -> torch.Tensor:
    """Shift each image `(B, 1, S, S)` by a random -shift..shift pixels in x and y (background -1 fills in),
    mirror it left-right with probability 1/2 if `flip`, add pixel noise."""
    B, S = x.shape[0], x.shape[-1]
    padded = F.pad(x, (shift,) * 4, value=-1.0)  # (B, 1, S + 2 shift, S + 2 shift)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, B), generator=gen)
    rows = (dy[:, None] + torch.arange(S))[:, :, None].expand(B, S, S)  # (B, S, S) row index
    cols = (dx[:, None] + torch.arange(S))[:, None, :].expand(B, S, S)
    out = padded[torch.arange(B)[:, None, None], 0, rows, cols][:, None]  # (B, 1, S, S)
    if flip:
        mirror = torch.rand(B, generator=gen) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(-1), out)
    return (out + noise * torch.randn(out.shape, generator=gen)).clamp(-1, 1)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    hits = [(model(x).argmax(1) == y).sum() for x, y in zip(images.split(batch_size), labels.split(batch_size))]
    return (sum(hits) / len(labels)).item()


def train(args: argparse.Namespace) -> tuple[DigitClassifier, float]:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = DATA[args.model]("train")
    fashion = args.model == "fashion"
    if fashion and args.arch != "cnn":
        raise ValueError("--arch mlp is the digits judge (64 input pixels); the fashion classifier is --arch cnn.")
    model = DigitClassifier(args.width, args.feature_dim, side=28) if fashion else ARCHS[args.arch](args.width, args.feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * ((len(x_train) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(total=steps, desc="train classifier")
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(x_train), generator=gen).split(args.batch_size):
            loss = F.cross_entropy(model(augment(x_train[idx], gen, args.noise, 2 if fashion else 1, fashion)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    x_test, y_test = DATA[args.model]("test")  # held out: measured once, never trained on
    return model.eval(), accuracy(model, x_test, y_test)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Train the digits (8x8) or fashion (28x28) classifier (reward model / Frechet features) on the train split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="digits", choices=sorted(DATA), help="whose images: digits or fashion")
    p.add_argument("--out", default=None, help="output folder (default: weights/digits_classifier or weights/fashion_classifier)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training split (default: 40 digits, 4 fashion)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 64 digits, 128 fashion)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle schedule)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    p.add_argument("--noise", type=float, default=0.1, help="std of the Gaussian pixel noise augmentation")
    p.add_argument("--arch", default="cnn", choices=sorted(ARCHS), help="cnn (the reward / FD model) or mlp (the digits judge)")
    p.add_argument("--width", type=int, default=None,
                   help="cnn: channels of the first conv layers (32 digits, 16 fashion); mlp: hidden width (256)")
    p.add_argument("--feature-dim", type=int, default=128, help="width of the penultimate feature layer")
    p.add_argument("--seed", type=int, default=0, help="seeds init, shuffling and augmentation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    cnn_width = 32 if args.arch == "cnn" else 256
    for key, digits, fashion in (("epochs", 40, 4), ("batch_size", 64, 128), ("width", cnn_width, 16)):  # per-model defaults
        if getattr(args, key) is None:
            setattr(args, key, digits if args.model == "digits" else fashion)
    out = Path(args.out or WEIGHTS[args.model])
    cli.check_out([out / "model.safetensors", out / "config.json"], args.overwrite, "eval.benchmark.classifier")  # before training

    t0 = time.time()
    model, test_acc = train(args)
    seconds = time.time() - t0
    n_test = len(DATA[args.model]("test")[1])
    print(f"held-out test accuracy {test_acc:.4f} ({test_acc * n_test:.0f}/{n_test}), trained in {seconds:.1f} s")

    command = "python -m eval.benchmark.classifier " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta = dict(test_accuracy=round(test_acc, 4), seed=args.seed, epochs=args.epochs, train_command=command)
    save_safetensors(model.state_dict(), out / "model.safetensors", meta, overwrite=args.overwrite)
    side = model.config.get("side", 8)
    config = dict(model.config, input_shape=[1, side, side], input_range=[-1, 1], train_seconds=round(seconds, 1), **meta)
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    print(f"wrote {out}/model.safetensors and config.json")


if __name__ == "__main__":
    cli.run(main)
