"""Files on disk, one module per format: saved masks (``mask_file``), checkpoints
(``checkpoint``), the child-only optimizer's state (``child_optim_state``), config snapshots
(``config_snapshot``), the architecture fingerprint they record (``fingerprint``), and the one
atomic-write helper they all use (``atomic``)."""
