"""noprop_dist: distributed training of NoProp (Li, Teh, Pascanu 2025) without back-propagation
between blocks.

Where things live:

* ``schedule``    the math (schedule, SNR weights, a_t/b_t/c_t, closed-form sampling, KL)
* ``models``      the DT block (Figure 6), the head, label embeddings
* ``data``        datasets, converted once to memory-mapped Arrow IPC
* ``units``       training one unit (a block or the head); no Ray
* ``local``       the in-process trainer
* ``coordinator`` the Ray trainer (the only module that imports Ray)
* ``inference``   the Eq. 3 chain and evaluation
* ``results``     manifest, checkpoints of units, summary, export; ``checkpoint`` the run directory
* ``config``      typed config, TOML presets in ``configs/``; ``cli`` the ``noprop-dist`` command
"""

__version__ = "0.1.0"
