"""Remote-code templates copied into Hugging Face exports (never imported from here: ``modeling_qsparse``
imports the ops modules that the export places next to it)."""
