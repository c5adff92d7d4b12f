"""Other devices: their keys as ``/keys/query`` reports them, checked, and who we track."""
