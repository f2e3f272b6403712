"""Files: packed ``.memfit`` model files (``serialize``), digest-checked training checkpoints
(``checkpoint``) and the data-set readers (``datasets``)."""
