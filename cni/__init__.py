"""mesh-cni: a chained CNI plugin that programs the sidecar redirect with netlink nftables.

Keep this file empty of imports: the plugin runs as a fresh process per pod start.
"""
