"""I/O: input readers, output writers, object storage, part files and the job folder's own files."""
