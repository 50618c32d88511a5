//! Printing: a [`Config`] turned back into the file layer, for `check-config`.
//!
//! The inverse of `validate`: every typed value is written the way the file
//! spells it, and the file layer's `Serialize` gives the TOML, so every key
//! appears with its effective value. Parsing the output again gives an equal
//! [`Config`] (tested here and by the `config` fuzz target).

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::file;
use super::{
    BouncePolicy, Config, DeliveryConfig, DomainConfig, LogFormat, Route, ServerConfig, Spf,
    TlsPolicy, UnknownRecipients, WhenPrimaryUp,
};

/// The effective configuration as TOML (see [`Config::to_toml`]).
pub(super) fn to_toml(config: &Config) -> String {
    let file = to_file(config);
    toml::to_string(&file).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
}

fn to_file(config: &Config) -> file::File {
    file::File {
        server: server(&config.server),
        tls: config.tls.as_ref().map(|t| file::Tls {
            cert: t.cert.display().to_string(),
            key: t.key.display().to_string(),
        }),
        spool: file::Spool {
            path: config.spool.path.display().to_string(),
            max_size: config.spool.max_size,
        },
        delivery: delivery(&config.delivery),
        http: file::Http {
            listen: config.http.listen.to_string(),
            admin_token_file: config
                .http
                .admin_token_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        },
        log: file::Log {
            format: match config.log.format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
            .into(),
            level: config.log.level.clone(),
        },
        greylist: file::Greylist {
            delay: format_duration(config.greylist.delay),
            window: format_duration(config.greylist.window),
            remember: format_duration(config.greylist.remember),
        },
        domain: config.domains.iter().map(domain).collect(),
        fetch: config.fetch.iter().map(super::fetch::to_file).collect(),
    }
}

fn server(s: &ServerConfig) -> file::Server {
    let nets = |v: &[IpNet]| v.iter().map(IpNet::to_string).collect();
    file::Server {
        hostname: s.hostname.clone(),
        also_known_as: s.also_known_as.clone(),
        listen: s.listen.iter().map(SocketAddr::to_string).collect(),
        max_message_size: s.max_message_size,
        max_recipients: s.max_recipients,
        max_connections: s.max_connections,
        max_connections_per_ip: s.max_connections_per_ip,
        max_connection_rate_per_ip: s.max_connection_rate_per_ip,
        max_received_headers: s.max_received_headers,
        command_timeout: format_duration(s.command_timeout),
        data_timeout: format_duration(s.data_timeout),
        allow: nets(&s.allow),
        deny: nets(&s.deny),
        etrn_allow: nets(&s.etrn_allow),
        trusted: nets(&s.trusted),
        dnsbl: s.dnsbl.iter().map(ToString::to_string).collect(),
        dnswl: s.dnswl.iter().map(ToString::to_string).collect(),
        dnsbl_threshold: s.dnsbl_threshold,
    }
}

fn delivery(d: &DeliveryConfig) -> file::Delivery {
    file::Delivery {
        port: d.port,
        nameservers: d.nameservers.iter().map(SocketAddr::to_string).collect(),
        retry_initial: format_duration(d.retry_initial),
        retry_factor: d.retry_factor,
        retry_max: format_duration(d.retry_max),
        retry_jitter: d.retry_jitter,
        probe_interval: format_duration(d.probe_interval),
        health_interval: d
            .health_interval
            .map(format_duration)
            .unwrap_or_else(|| "off".into()),
        drain_guard: d.drain_guard,
        line_length_limit: d.line_length_limit,
        max_queue_lifetime: format_duration(d.max_queue_lifetime),
        delay_warning_after: d
            .delay_warning_after
            .map(format_duration)
            .unwrap_or_else(|| "off".into()),
        connections_per_domain: d.connections_per_domain,
        messages_per_connection: d.messages_per_connection,
        tls: d.tls.as_str().into(),
        bounce: match d.bounce {
            BouncePolicy::Sender => "sender",
            BouncePolicy::Postmaster => "postmaster",
            BouncePolicy::Drop => "drop",
        }
        .into(),
        postmaster: d.postmaster.clone(),
    }
}

fn domain(dom: &DomainConfig) -> file::Domain {
    file::Domain {
        name: dom.name.clone(),
        include_subdomains: dom.include_subdomains,
        route: dom.route.as_ref().map(Route::to_string).unwrap_or_default(),
        recipients: dom.recipients.clone(),
        recipients_file: dom
            .recipients_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        verify_recipients: dom.verify_recipients,
        unknown_recipients: match dom.unknown_recipients {
            UnknownRecipients::Accept => "accept",
            UnknownRecipients::Tempfail => "tempfail",
        }
        .into(),
        tls: dom.tls.map(TlsPolicy::as_str).unwrap_or_default().into(),
        when_primary_up: match dom.when_primary_up {
            WhenPrimaryUp::Accept => "accept",
            WhenPrimaryUp::Defer => "defer",
        }
        .into(),
        spf: match dom.spf {
            Spf::Off => "off",
            Spf::Tag => "tag",
            Spf::Reject => "reject",
        }
        .into(),
        greylist: dom.greylist,
    }
}

/// "5m", "1h 30m", "5d": the largest units that divide the duration exactly.
/// A whole number of days, hours, minutes or seconds in the largest unit
/// that divides it ("35d", not humantime's "1month4days13h26m24s").
pub(super) fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() == 0 && secs > 0 {
        for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
            if secs.is_multiple_of(size) {
                return format!("{}{unit}", secs / size);
            }
        }
    }
    humantime::format_duration(d).to_string().replace(' ', "")
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{MINIMAL, parse};

    #[test]
    fn effective_config_round_trips() {
        let c = parse(
            r#"
            [server]
            hostname = "mx2.example.net"
            deny = ["192.0.2.0/24"]
            [delivery]
            delay_warning_after = "4h"
            max_queue_lifetime = "1d 12h"
            retry_jitter = 0.0
            drain_guard = 0
            line_length_limit = 0
            [http]
            admin_token_file = "/etc/mxspool/admin-token"
            [tls]
            cert = "/c.pem"
            key = "/k.pem"
            [[domain]]
            name = "example.com"
            route = "[::1]:2526"
            tls = "required"
            [[domain]]
            name = "example.org"
            include_subdomains = true
            route = "mx.example.org:25"
            "#,
        )
        .unwrap();
        let printed = c.to_toml();
        let again = parse(&printed).unwrap();
        assert_eq!(again, c, "{printed}");
        assert!(
            printed.contains("max_queue_lifetime = \"36h\""),
            "{printed}"
        );
        assert!(printed.contains("remember = \"35d\""), "{printed}");

        let plain = parse(MINIMAL).unwrap();
        let printed = plain.to_toml();
        assert!(
            printed.contains("delay_warning_after = \"off\""),
            "{printed}"
        );
        assert!(!printed.contains("[tls]"));
        assert_eq!(parse(&printed).unwrap(), plain);
    }
}
