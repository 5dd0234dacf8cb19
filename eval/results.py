"""`python -m eval.results --model fashion`: the benchmark results command (eval/benchmark/results.py) by its short name."""

from eval.benchmark.results import main

if __name__ == "__main__":
    main()
