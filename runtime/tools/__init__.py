"""Tools over exports: the quality report, golden vectors and the step traces behind them, quantizing an export
(quantize_export.quantize_export, which `kvgraph export --quantize` calls too), the benchmark's workers."""
