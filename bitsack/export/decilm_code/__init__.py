"""The DeciLM / Nemotron-NAS code a pruned compressed-tensors export carries beside its
config.json (``configuration_decilm.py``, ``modeling_decilm.py``; see ``bitsack.export.decilm``).

The files are copied as they are into the export, whose ``auto_map`` names them, so they import
only torch and transformers (never bitsack). They are importable from here too, for tests.
"""
