"""smart-resume's common package: everything both Cloud Functions and the command line share."""
