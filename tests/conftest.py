import os, sys, tempfile
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    "A private run cache so a test never reads what an earlier run trained."
    monkeypatch.setenv('SM_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('SM_PROGRESS', '0')
    return tmp_path / 'cache'


def pytest_configure(config):
    config.addinivalue_line('markers', 'browser: drives JupyterLab in headless Chromium (deselect with -m "not browser")')
    if os.environ.get('PYTEST_XDIST_WORKER'):
        # `make test` runs two pytest workers (pytest-xdist, one test file each at a time). On a small machine several
        # torch threads per worker only fight over the cores; a test about thread counts sets its own (test_threads,
        # test_faults_cache), and the processes a test starts keep torch's default.
        import torch
        torch.set_num_threads(1)
