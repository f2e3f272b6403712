"""Files: packed ``.memfit`` model files (``serialize``) and the data-set readers (``datasets``)."""
