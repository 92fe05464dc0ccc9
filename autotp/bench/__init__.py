"""The end-to-end benchmark (``autotp-bench``, ``python -m autotp.bench``, tools/benchmark.py):
runner.py drives the configurations, worker.py times them inside each rank, shapes.py makes
the models, report.py turns the findings into tables, JSON and a chart."""
