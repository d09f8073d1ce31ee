"""What stowaway's numbers are compared with, run as separate processes."""
