"""Upper bounds on the built-in networks' constructor arguments.

Far above any network that trains on one machine, and low enough that a config.json
from an untrusted source cannot make a constructor loop for hours building modules
(``num_layers=10**7``) or overflow int64 element counts on the meta device.
"""

#: channels, features, embedding sizes, classes
MAX_WIDTH = 2**24
#: residual blocks per network or per level, levels of a UNet
MAX_DEPTH = 1024
