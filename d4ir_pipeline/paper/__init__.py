"""The paper's comparison table: the other ways to get a student (baselines, DFMC, ...) scored like D4IR."""
