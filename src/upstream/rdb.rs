//! Receiving a full-sync payload: the `$<len>` and `$EOF:<mark>` forms, newline keepalives before
//! the header, and a `-` line meaning the master aborted.

use super::connection::MasterConnection;
use super::LinkError;
use crate::protocol::string2ll_str;
use crate::snapshot::SnapshotWriter;

/// Length of the random mark that frames an EOF-form payload.
pub const EOF_MARK_LEN: usize = 40;

/// Which framing the master used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadForm {
    Length,
    EofMark,
}

enum Header {
    Length(u64),
    EofMark(Vec<u8>),
}

async fn read_header(conn: &mut MasterConnection) -> Result<Header, LinkError> {
    loop {
        let line = conn.read_line("waiting for the RDB payload").await?;
        if line.is_empty() {
            continue;
        }
        if let Some(reason) = line.strip_prefix('-') {
            return Err(LinkError::MasterAborted(reason.to_string()));
        }
        let Some(spec) = line.strip_prefix('$') else {
            return Err(LinkError::BadPayload(format!("the first byte is not '$': {line:?}")));
        };
        if let Some(mark) = spec.strip_prefix("EOF:") {
            if mark.len() != EOF_MARK_LEN {
                return Err(LinkError::BadPayload(format!("EOF mark of {} bytes, expected 40", mark.len())));
            }
            return Ok(Header::EofMark(mark.as_bytes().to_vec()));
        }
        return string2ll_str(spec)
            .and_then(|len| u64::try_from(len).ok())
            .map(Header::Length)
            .ok_or_else(|| LinkError::BadPayload(format!("bad payload length {line:?}")));
    }
}

/// Transfer progress: (payload size or -1 for the EOF form, bytes read so far).
pub type Progress<'a> = &'a mut (dyn FnMut(i64, u64) + Send);

/// A transfer cut short is a truncated RDB: say how far it got.
fn truncated(error: LinkError, read: u64, expected: &str) -> LinkError {
    match error {
        LinkError::Closed | LinkError::Timeout(_) => {
            LinkError::Truncated(format!("payload truncated after {read} bytes (expected {expected}): {error}"))
        }
        other => other,
    }
}

/// Streams the payload into `writer`; leaves any bytes after it in the connection's buffer.
/// `progress` is called at the start, every 200 ms or so, and at the end.
pub async fn receive(
    conn: &mut MasterConnection,
    writer: &mut SnapshotWriter,
    progress: Progress<'_>,
) -> Result<PayloadForm, LinkError> {
    let header = read_header(conn).await?;
    let total = match &header {
        Header::Length(len) => *len as i64,
        Header::EofMark(_) => -1,
    };
    progress(total, 0);
    let mut read = 0u64;
    let mut last_report = tokio::time::Instant::now();
    let mut report = |read: u64, force: bool| {
        if force || last_report.elapsed().as_millis() >= 200 {
            last_report = tokio::time::Instant::now();
            progress(total, read);
        }
    };
    match header {
        Header::Length(len) => {
            while read < len {
                if conn.buf.is_empty() {
                    conn.fill("receiving the RDB payload").await.map_err(|e| truncated(e, read, &len.to_string()))?;
                }
                let take = (len - read).min(conn.buf.len() as u64) as usize;
                let chunk = conn.buf.split_to(take);
                writer.write(&chunk).await?;
                read += take as u64;
                report(read, false);
            }
            report(read, true);
            Ok(PayloadForm::Length)
        }
        Header::EofMark(mark) => {
            // The payload ends where the bytes read so far end with the mark (the master sends nothing
            // after it until we ACK), so the last 40 bytes are held back until more arrive.
            let mut window: Vec<u8> = Vec::with_capacity(128 * 1024);
            loop {
                if conn.buf.is_empty() {
                    conn.fill("receiving the RDB payload")
                        .await
                        .map_err(|e| truncated(e, read, "an EOF mark not seen"))?;
                }
                let chunk = conn.buf.split();
                window.extend_from_slice(&chunk);
                read += chunk.len() as u64;
                if window.ends_with(&mark) {
                    writer.write(&window[..window.len() - EOF_MARK_LEN]).await?;
                    report(read, true);
                    return Ok(PayloadForm::EofMark);
                }
                if window.len() > EOF_MARK_LEN {
                    let release = window.len() - EOF_MARK_LEN;
                    writer.write(&window[..release]).await?;
                    window.drain(..release);
                }
                report(read, false);
            }
        }
    }
}
