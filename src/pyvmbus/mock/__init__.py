"""Mock VMBus: fake sysfs root, mock kernel and mock host (see MockVmbus)."""
