"""The embedded default: a corpus, tokenizer, teacher and caches built from the Python standard
library's own source, shared by `kdpipe demo` and `kdpipe experiment` (`setup: embedded`)."""
