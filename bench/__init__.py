"""The benchmarks. A regular package (not a namespace one), so that ``bench.common`` and the
others always resolve to this directory, whatever else named ``bench`` is on the path."""
