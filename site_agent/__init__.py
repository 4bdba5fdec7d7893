"""What runs at a site: enrolment, the join loop, verified downloads, resumable uploads."""
