"""Whether the Fashion-MNIST files are installed: the training tests need the real data set."""
import pytest

from int8fx.data import DataNotFound, find_fashion_mnist

try:
    find_fashion_mnist()
    HAVE_DATA = True
except DataNotFound:
    HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
