"""``python -m merbridge.cni``: run the plugin (same as ``merbridge-cni``)."""
from merbridge.cni.main import main

main()
