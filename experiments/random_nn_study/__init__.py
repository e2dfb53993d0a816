"""The finite-network convergence study behind ``experiments/random_nn.py``, split by job.

``sampling`` loads the MNIST test digits and draws outputs of random finite networks ``model.nn(C)``;
``statistics`` compares those outputs with the exact kernel (second moments, correlations, Gaussianity);
``plots`` draws the scatter, QQ and error-against-width figures; ``report`` writes ``summary.json``,
``summary.md`` and the plots. The command line (argparse and ``main``) is the script ``experiments/random_nn.py``
itself, which puts ``experiments/`` on ``sys.path`` so that this package is found (``experiments/`` is not an
installed package). Dependencies run one way: ``report`` imports ``plots``; nothing here imports the script.
"""
