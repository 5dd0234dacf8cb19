"""Text-to-image preference scorers (PickScore, HPSv2.1, ImageReward, LAION aesthetic) and the paired report.

    python -m eval.t2i.score --a OUT/npo --b OUT/base --prompts prompts.jsonl

scorers.py: the Scorer interface, the CLIP scorers and the aesthetic predictor; imagereward.py: ImageReward
(BLIP); clip_checkpoints.py: their CLIP checkpoint layouts; score.py: the command line.
"""

from pathlib import Path

# The repository's weights/ folder (weights/README.md), whatever the working directory.
WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
