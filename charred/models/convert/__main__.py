"""`python -m charred.models.convert` is `python -m charred.convert` by another name."""

import runpy

if __name__ == '__main__':
  runpy.run_module('charred.convert', run_name='__main__', alter_sys=True)
