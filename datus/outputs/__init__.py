"""What people and training code read: drawings, the report, galleries, the HTML view, summaries
(describe), the manifest and the exports."""
