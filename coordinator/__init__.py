"""The federation service: state directory, store, CA and enrolment, assignments, artifact
serving, upload acceptance and the operator's CLI. It never trains and needs no GPU."""
