//! The IMAP side of a fetch, on async-imap: LOGIN (or AUTHENTICATE PLAIN
//! where LOGIN is disabled), SELECT, the UIDs and sizes of every message,
//! `BODY.PEEK[]` (so a failed run leaves messages unread), `\Deleted` then
//! `UID EXPUNGE` (UIDPLUS) or EXPUNGE, and IDLE between runs when the
//! server offers it.
//!
//! A message's ID is `UIDVALIDITY.UID`: if the server renumbers the
//! mailbox, old marks no longer match and the duplicate check by
//! Message-ID and size is what keeps messages from being stored twice.

use std::net::IpAddr;
use std::time::Duration;

use async_imap::extensions::idle::IdleResponse;
use async_imap::{Authenticator, Client, Session};
use futures_util::TryStreamExt;

use super::net::{self, TIMEOUT};
use super::{FetchError, Listed};
use crate::config::{FetchConfig, FetchTls};
use crate::outbound::tls::Stream;

/// UIDs named in one command (keeps command lines short).
const UIDS_PER_COMMAND: usize = 500;

/// Longest a single IDLE lasts before it is renewed (RFC 2177: under 29 minutes).
const IDLE_RENEW: Duration = Duration::from_secs(25 * 60);

pub(super) struct Imap {
    session: Session<Stream>,
    /// The server's address.
    pub(super) peer: Option<IpAddr>,
    uid_validity: u32,
    uidplus: bool,
    pub(super) idle: bool,
    /// UIDs flagged `\Deleted` in this session, expunged at [`Imap::close`].
    deleted: Vec<u32>,
}

/// How an IDLE ended.
pub(super) enum Woken {
    /// The mailbox changed (new mail, most likely).
    Changed,
    /// Nothing happened for the whole wait.
    Quiet,
    /// The caller's `stop` future finished first.
    Stopped,
}

impl Imap {
    /// Connected, TLS as configured, logged in, and the mailbox selected.
    pub(super) async fn open(account: &FetchConfig, password: &str) -> Result<Imap, FetchError> {
        let stream = net::connect(account).await?;
        let peer = net::peer(&stream);
        let mut client = Client::new(stream);
        greeting(&mut client).await?;
        if account.tls == FetchTls::Starttls {
            timed(client.run_command_and_check_ok("STARTTLS", None)).await?;
            client = Client::new(net::upgrade(client.into_inner(), account).await?);
        }
        let mut session = login(client, account, password).await?;
        let (uid_validity, uidplus, idle) = Imap::select(&mut session, account).await?;
        Ok(Imap {
            session,
            peer,
            uid_validity,
            uidplus,
            idle,
            deleted: Vec::new(),
        })
    }

    /// SELECTs the mailbox; returns its UIDVALIDITY and whether UIDPLUS and
    /// IDLE are offered.
    async fn select(
        session: &mut Session<Stream>,
        account: &FetchConfig,
    ) -> Result<(u32, bool, bool), FetchError> {
        let caps = timed(session.capabilities()).await?;
        let (uidplus, idle) = (caps.has_str("UIDPLUS"), caps.has_str("IDLE"));
        let mailbox = timed(session.select(&account.mailbox)).await?;
        let uid_validity = mailbox.uid_validity.ok_or_else(|| {
            FetchError::Protocol(
                "the server gives no UIDVALIDITY: messages cannot be recognised again".into(),
            )
        })?;
        Ok((uid_validity, uidplus, idle))
    }

    /// Every message with its `UIDVALIDITY.UID` and size.
    pub(super) async fn list(&mut self) -> Result<Vec<Listed>, FetchError> {
        let fetches: Vec<_> = timed(async {
            let stream = self.session.uid_fetch("1:*", "(UID RFC822.SIZE)").await?;
            stream.try_collect::<Vec<_>>().await
        })
        .await?;
        let mut listed: Vec<Listed> = fetches
            .iter()
            .filter_map(|f| {
                Some(Listed {
                    number: f.uid?,
                    uid: format!("{}.{}", self.uid_validity, f.uid?),
                    size: f.size.map_or(0, u64::from),
                })
            })
            .collect();
        listed.sort_by_key(|l| l.number);
        listed.dedup_by_key(|l| l.number);
        Ok(listed)
    }

    /// The whole message, without setting `\Seen`.
    pub(super) async fn retrieve(&mut self, message: &Listed) -> Result<Vec<u8>, FetchError> {
        let uid = message.number;
        let fetches: Vec<_> = timed(async {
            let stream = self
                .session
                .uid_fetch(uid.to_string(), "BODY.PEEK[]")
                .await?;
            stream.try_collect::<Vec<_>>().await
        })
        .await?;
        fetches
            .iter()
            .find(|f| f.uid == Some(uid) || f.uid.is_none())
            .and_then(|f| f.body())
            .map(<[u8]>::to_vec)
            .ok_or_else(|| FetchError::Protocol(format!("UID {uid}: the server sent no body")))
    }

    /// Flags the messages `\Deleted` (one UID STORE per few hundred);
    /// [`Imap::close`] or [`Imap::expunge`] expunges them.
    pub(super) async fn delete(&mut self, messages: &[Listed]) -> Result<(), FetchError> {
        for chunk in messages.chunks(UIDS_PER_COMMAND) {
            let set = uid_set(chunk.iter().map(|m| m.number));
            timed(async {
                let stream = self
                    .session
                    .uid_store(set, "+FLAGS.SILENT (\\Deleted)")
                    .await?;
                stream.try_collect::<Vec<_>>().await
            })
            .await?;
            self.deleted.extend(chunk.iter().map(|m| m.number));
        }
        Ok(())
    }

    /// Expunges what this session deleted: only those UIDs with UIDPLUS;
    /// without it, EXPUNGE (which also removes what another client flagged).
    pub(super) async fn expunge(&mut self) -> Result<(), FetchError> {
        if self.deleted.is_empty() {
            return Ok(());
        }
        let session = &mut self.session;
        if self.uidplus {
            for chunk in self.deleted.chunks(UIDS_PER_COMMAND) {
                let set = uid_set(chunk.iter().copied());
                timed(async {
                    let stream = session.uid_expunge(set).await?;
                    stream.try_collect::<Vec<_>>().await
                })
                .await?;
            }
        } else {
            timed(async {
                let stream = session.expunge().await?;
                stream.try_collect::<Vec<_>>().await
            })
            .await?;
        }
        self.deleted.clear();
        Ok(())
    }

    /// LOGOUT, after expunging.
    pub(super) async fn close(mut self) -> Result<(), FetchError> {
        self.expunge().await?;
        timed(self.session.logout()).await
    }

    /// Waits in IDLE until the mailbox changes, `wait` passes, or `stop`
    /// finishes; then ends the IDLE, and the session is ready for another run.
    pub(super) async fn idle(
        self,
        wait: Duration,
        stop: impl Future<Output = ()>,
    ) -> Result<(Imap, Woken), FetchError> {
        let Imap {
            session,
            peer,
            uid_validity,
            uidplus,
            idle,
            deleted,
        } = self;
        let mut handle = session.idle();
        timed(handle.init()).await?;
        let woken = {
            let (wait, _interrupt) = handle.wait_with_timeout(wait.min(IDLE_RENEW));
            tokio::select! {
                r = wait => match r.map_err(imap_error)? {
                    IdleResponse::NewData(_) => Woken::Changed,
                    IdleResponse::Timeout | IdleResponse::ManualInterrupt => Woken::Quiet,
                },
                () = stop => Woken::Stopped,
            }
        };
        let session = timed(handle.done()).await?;
        let imap = Imap {
            session,
            peer,
            uid_validity,
            uidplus,
            idle,
            deleted,
        };
        Ok((imap, woken))
    }
}

/// `1,5,7`: the UIDs as an IMAP sequence set.
fn uid_set(uids: impl Iterator<Item = u32>) -> String {
    uids.map(|u| u.to_string()).collect::<Vec<_>>().join(",")
}

/// The server's greeting: `* OK` (or `* PREAUTH`); `* BYE` is a refusal.
async fn greeting(client: &mut Client<Stream>) -> Result<(), FetchError> {
    match tokio::time::timeout(TIMEOUT, client.read_response()).await {
        Err(_) => Err(FetchError::Protocol("no greeting from the server".into())),
        Ok(Err(e)) => Err(FetchError::Protocol(e.to_string())),
        Ok(Ok(None)) => Err(FetchError::Protocol(
            "the server closed the connection".into(),
        )),
        Ok(Ok(Some(_))) => Ok(()),
    }
}

/// LOGIN; where the server disables it (`LOGINDISABLED`), AUTHENTICATE PLAIN.
async fn login(
    client: Client<Stream>,
    account: &FetchConfig,
    password: &str,
) -> Result<Session<Stream>, FetchError> {
    let login = client.login(&account.username, password);
    let (e, client) = match tokio::time::timeout(TIMEOUT, login).await {
        Err(_) => return Err(FetchError::Protocol("LOGIN timed out".into())),
        Ok(Ok(session)) => return Ok(session),
        Ok(Err(failed)) => failed,
    };
    match e {
        async_imap::error::Error::No(why) => Err(FetchError::Auth(why)),
        async_imap::error::Error::Bad(_) => {
            let plain = Plain {
                username: &account.username,
                password,
            };
            let auth = client.authenticate("PLAIN", plain);
            match tokio::time::timeout(TIMEOUT, auth).await {
                Err(_) => Err(FetchError::Protocol("AUTHENTICATE timed out".into())),
                Ok(Ok(session)) => Ok(session),
                Ok(Err((async_imap::error::Error::No(why), _))) => Err(FetchError::Auth(why)),
                Ok(Err((other, _))) => Err(imap_error(other)),
            }
        }
        other => Err(imap_error(other)),
    }
}

/// SASL PLAIN (RFC 4616): authorisation identity empty.
struct Plain<'a> {
    username: &'a str,
    password: &'a str,
}

impl Authenticator for Plain<'_> {
    type Response = String;

    fn process(&mut self, _challenge: &[u8]) -> String {
        format!("\0{}\0{}", self.username, self.password)
    }
}

/// An IMAP step with the reply timeout.
async fn timed<T>(
    step: impl Future<Output = async_imap::error::Result<T>>,
) -> Result<T, FetchError> {
    match tokio::time::timeout(TIMEOUT, step).await {
        Err(_) => Err(FetchError::Protocol(
            "timed out waiting for the server".into(),
        )),
        Ok(r) => r.map_err(imap_error),
    }
}

fn imap_error(e: async_imap::error::Error) -> FetchError {
    match e {
        async_imap::error::Error::No(why) => FetchError::Refused(why),
        other => FetchError::Protocol(other.to_string()),
    }
}
