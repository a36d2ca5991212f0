"""The vhost-user-fs device: protocol server, virtio-fs queues, FUSE, passthrough."""

__version__ = "0.1.0"
