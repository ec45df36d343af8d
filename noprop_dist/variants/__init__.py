"""What a run trains: the unit interface (``base``), NoProp-DT (``dt``), NoProp-CT/FM
(``continuous``), the back-propagation baselines (``backprop``) and the registry that names
them (``registry``)."""
