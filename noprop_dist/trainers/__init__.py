"""Who trains where: in this process (``local``), DDP on Ray Train (``ddp``) and the Ray
coordinator (``ray/``); ``registry`` finds one by backend. Only ``ddp`` and ``ray/`` import Ray."""
