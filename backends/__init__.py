"""Code generators and runtimes: reference (torch), triton."""
