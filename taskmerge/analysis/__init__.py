"""Diagnostics of task vectors and merges (the quantities the methods' papers define), with plots.

Each submodule is self-contained; import the one you need, e.g. ``taskmerge.analysis.direction``.
"""
