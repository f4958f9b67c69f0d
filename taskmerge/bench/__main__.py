"""``python -m taskmerge.bench``: run the benchmark (see :mod:`taskmerge.bench.runner`)."""

from taskmerge.bench.runner import main

raise SystemExit(main())
