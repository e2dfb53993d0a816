"""The candidate search behind ``experiments/beyond_paper.py``, split by job.

``candidates`` names the kernels tried (a network, the NNGP or the NTK, its parameters) and builds the networks
that ``gpytorch_cnngp.architectures`` does not have; ``report`` turns a finished candidate into a
row (kernel cost per entry, projected cost at the paper's scale, the machine) and writes ``results.json``,
``results.md`` and ``validation_vs_cost.png``. The command line is the script itself, which puts
``experiments/`` on ``sys.path`` so that this package is found. The ridge grid and its choice on the validation
images are the library's (``gpytorch_cnngp.ridge``). Dependencies run one way: nothing here imports the script.
"""
