"""``python -m taskmerge.bench.vision``: the vision benchmark (see :mod:`taskmerge.bench.vision.runner`)."""

from taskmerge.bench.vision.runner import main

raise SystemExit(main())
