"""noprop_dist: distributed training of NoProp (Li, Teh, Pascanu 2025) without back-propagation
between blocks.

Where things live (each folder's ``__init__`` says more):

* ``core/``      the math: schedules, SNR weights, a_t/b_t/c_t, closed-form sampling, CT/FM losses
* ``nets/``      networks that only compute: DT block and head, baselines, CT/FM net, inference chains
* ``variants/``  what a run trains: the unit interface, DT, CT/FM, the baselines, the registry
* ``training/``  the unit loop and what surrounds it (meters, sync, preflight); no Ray
* ``run/``       the run directory, the lifecycle every trainer follows, reading results back
* ``trainers/``  in-process, DDP on Ray Train, torchrun, and ``ray/`` (coordinator, placement, cluster)
* ``config``, ``data``, ``errors``, ``cli`` (the ``noprop-dist`` command), presets in ``configs/``
"""

__version__ = "0.1.0"
