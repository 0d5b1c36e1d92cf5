"""The command-line job (``python main.py --config=...``): models, data, the
training loop, the compression pipeline, studies and reports.

Needs the ``job`` extra (``pip install 'gkq_jax[job]'``); the library in
:mod:`gkq_jax` never imports it.
"""
