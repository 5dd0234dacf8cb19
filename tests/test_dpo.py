"""The Diffusion-DPO loss (npo_min/dpo.py) against a direct transcription of Wallace et al. (2024), Eq. 14, on
random tensors, and its reversal (Diffusion-NPO Eq. 8)."""

import math

import torch

from npo_min.dpo import dpo_loss, dpo_step_loss, per_sample_error
from npo_min.schedule import NoiseSchedule


def transcription(model_w, model_l, ref_w, ref_l, eps, beta):
    """L = -E log sigma(-beta/2 * (||eps - eps_theta(x_w)||^2 - ||eps - eps_theta(x_l)||^2
                                  - (||eps - eps_ref(x_w)||^2 - ||eps - eps_ref(x_l)||^2))), per pair, in float64."""
    out = []
    for i in range(eps.shape[0]):
        e = lambda pred: float(((eps[i].double() - pred[i].double()) ** 2).mean())
        z = -beta / 2 * ((e(model_w) - e(model_l)) - (e(ref_w) - e(ref_l)))
        out.append(-math.log(1.0 / (1.0 + math.exp(-z))))
    return sum(out) / len(out)


def test_loss_matches_transcription_and_reverse_swaps_the_pair():
    g = torch.Generator().manual_seed(0)
    eps, mw, ml, rw, rl = (torch.randn(6, 4, 5, 5, generator=g) for _ in range(5))
    for beta in (1.0, 50.0):
        e = lambda pred: per_sample_error(pred, eps)
        got, stats = dpo_loss(e(mw), e(ml), e(rw), e(rl), beta)
        want = transcription(mw, ml, rw, rl, eps, beta)
        assert abs(got.item() - want) <= 1e-5 * max(1.0, abs(want)), (got.item(), want)
        rev, _ = dpo_loss(e(mw), e(ml), e(rw), e(rl), beta, reverse=True)
        assert abs(rev.item() - transcription(ml, mw, rl, rw, eps, beta)) <= 1e-5 * max(1.0, abs(want))
        assert 0.0 <= stats["implicit_acc"] <= 1.0
    # at model == reference every pair's inside term is 0: loss = log 2 whatever the pair
    same, stats = dpo_loss(e(mw), e(ml), e(mw), e(ml), 500.0)
    assert abs(same.item() - math.log(2)) < 1e-6 and stats["reward_margin"] == 0.0


def test_step_shares_noise_and_timestep_and_gradient_prefers_the_chosen_image():
    """A model that denoises x_w better than the reference lowers DPO's loss and raises DPO-NPO's."""
    schedule = NoiseSchedule.sd()
    g = torch.Generator().manual_seed(1)
    x_w, x_l = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g)
    seen = []

    def reference(x, t, c):
        seen.append((x.clone(), t.clone()))
        return torch.zeros_like(x)

    def oracle_on_w(x, t, c):  # predicts the true noise for the first half (x_w), zeros for x_l
        a, s = schedule.coefs(t, x)
        eps = (x - a * torch.cat([x_w, x_l])) / s
        return torch.cat([eps[:4], torch.zeros_like(eps[4:])])

    loss, _ = dpo_step_loss(oracle_on_w, reference, x_w, x_l, torch.zeros(4, 1), schedule, 10.0, generator=torch.Generator().manual_seed(2))
    rev, _ = dpo_step_loss(oracle_on_w, reference, x_w, x_l, torch.zeros(4, 1), schedule, 10.0, reverse=True,
                           generator=torch.Generator().manual_seed(2))
    assert loss.item() < math.log(2) < rev.item()
    x_t, t = seen[0]
    assert torch.equal(t[:4], t[4:])  # one timestep per pair
    a, s = schedule.coefs(t, x_t)
    eps_w, eps_l = ((x_t - a * torch.cat([x_w, x_l])) / s).chunk(2)
    assert torch.allclose(eps_w, eps_l, atol=1e-4)  # one noise per pair


def test_v_prediction_errors_are_on_v():
    """prediction_type "v_prediction": the errors are ||v - v_theta||^2 with v = alpha eps - sigma x0, i.e. the
    eps errors / alpha_t^2 (alpha^2 + sigma^2 = 1); checked on a v model built from an eps model against the
    transcription of the loss with those weighted errors."""
    from npo_min.schedule import add_noise

    schedule = NoiseSchedule.sd()
    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    eps_model = lambda w: (lambda x, t, c: torch.einsum("ij,bj...->bi...", w, x) * 0.3 + c)  # noqa: E731

    def as_v(f):  # v = (eps - sigma x_t) / alpha, the same predictor in v form
        def v(x, t, c):
            a, s = schedule.coefs(t, x)
            return (f(x, t, c) - s * x) / a
        return v

    x_w, x_l = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    cond = torch.randn(4, 1, 1, 1, generator=g)
    got, _ = dpo_step_loss(as_v(eps_model(w1)), as_v(eps_model(w2)), x_w, x_l, cond, schedule, 5.0, reverse=True,
                           generator=torch.Generator().manual_seed(9), prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(9)  # the same draws as dpo_step_loss
    t = torch.randint(0, schedule.num_train_timesteps, (4,), generator=gen)
    eps = torch.randn(x_w.shape, generator=gen)
    a, s = schedule.coefs(t, x_w)
    total = 0.0
    for i in range(4):
        err = lambda f, x: float(((eps - f(add_noise(x, eps, a, s), t, cond))[i].double() ** 2).mean() / a[i].double() ** 2)  # noqa: E731
        ew, el, rw, rl = err(eps_model(w1), x_w), err(eps_model(w1), x_l), err(eps_model(w2), x_w), err(eps_model(w2), x_l)
        z = -5.0 / 2 * ((el - ew) - (rl - rw))  # reversed
        total += -math.log(1.0 / (1.0 + math.exp(-z)))
    assert abs(got.item() - total / 4) <= 1e-4 * max(1.0, total / 4), (got.item(), total / 4)
    eps_loss, _ = dpo_step_loss(eps_model(w1), eps_model(w2), x_w, x_l, cond, schedule, 5.0, reverse=True,
                                generator=torch.Generator().manual_seed(9))
    assert abs(eps_loss.item() - got.item()) > 1e-4  # the weighting matters: v is not a relabelled eps
