"""Files: atomic checkpoint directories and orbax trees (`checkpoint`), the durable raw array files
of the work directory (`arrayfile`), the shipped texts and tokenizers (`data`)."""
