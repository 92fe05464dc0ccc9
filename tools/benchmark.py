"""The end-to-end benchmark: 1 rank with all cores against N ranks, for each autotp option.
Same as ``autotp-bench`` and ``python -m autotp.bench``; see ``--help``.

    python tools/benchmark.py --model llama-1b gptj-1b --out docs/benchmark
"""
from autotp.bench.runner import main

if __name__ == "__main__":
    main()
