"""Who is who: TLS, certificates, participant tokens, delegation statements, signatures."""
