"""`python -m eval.results --model fashion`: the benchmark results command (eval/benchmark/results.py) by its short name."""

from eval.benchmark.results import main
from npo_min import cli

if __name__ == "__main__":
    cli.run(main)
