"""student.experiment (issue 6)."""
