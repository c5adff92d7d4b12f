"""Reading other libraries' crypto stores, to move a device to olmstead without losing it."""
