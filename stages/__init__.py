"""One thin entry point per DVC stage: read params, call pgolf, write outputs.

Run them as modules (``python -m stages.tokenize``) or through ``pgolf
STAGE``: a script named like a standard-library module, run as a file, would
shadow that module for the whole interpreter.
"""
