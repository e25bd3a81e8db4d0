"""Suite-wide set-up: temporary files stay inside pytest's own temporary folder.

TFDS leaves an empty `tmp…tfds` folder in the system's temporary directory every time
a builder is made for a data set that is not prepared yet
(`DatasetInfo.initialize_from_bucket`); the suite makes hundreds. Pointing `TMPDIR`
(inherited by the subprocesses the tests start) at a folder under pytest's base
temporary folder keeps them there, and pytest removes old base folders itself.
"""

import os
import tempfile

import pytest


@pytest.fixture(autouse=True, scope='session')
def _temporary_files_under_pytest(tmp_path_factory):
  folder = tmp_path_factory.mktemp('tmpdir')
  before = os.environ.get('TMPDIR')
  os.environ['TMPDIR'] = str(folder)
  tempfile.tempdir = None  # gettempdir() reads TMPDIR again.
  yield folder
  if before is None:
    os.environ.pop('TMPDIR', None)
  else:
    os.environ['TMPDIR'] = before
  tempfile.tempdir = None
