"""student.finetune (issue 6)."""
