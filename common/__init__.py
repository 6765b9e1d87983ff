"""Small mechanisms every package uses, with no dependency on the others: atomic file writes
(`common.files`) and partition-independent keyed random rows (`common.keyed_random`)."""
