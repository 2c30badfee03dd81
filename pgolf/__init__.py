"""pgolf: the Parameter Golf record system as a staged, cached DVC pipeline.

The package is the library; ``stages/`` holds one thin entry point per DVC
stage. Importing any module does nothing beyond defining names.
"""

__version__ = "0.1.0"
