//! Mailbox fetch: mail for our domains collected from an ISP's catch-all
//! mailbox (POP3/IMAP) instead of arriving over SMTP, spooled like inbound
//! mail. [`envelope`] works out, from a fetched message alone, whom to
//! deliver it to and with what sender.

pub mod envelope;
